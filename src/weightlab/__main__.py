from weightlab.cli import entry

entry()
