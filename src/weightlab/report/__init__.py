"""Tables, plots and progress bars for run directories."""

from weightlab.report.progress import display, track
from weightlab.report.tables import markdown_table, mean_std, pm

__all__ = ["display", "markdown_table", "mean_std", "pm", "track"]
