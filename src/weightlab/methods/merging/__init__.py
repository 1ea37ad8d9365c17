"""Model merging (paper key ``tall-masks``): task arithmetic, TIES, TALL masks, Consensus Merging, the mask
compression store and the streaming merge of real checkpoints.

The public facade is :mod:`weightlab.merging`."""
