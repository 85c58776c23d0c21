"""Whole experiments built from the library: the demo, the synthetic benchmark, checkpoint
sweeps, and the stage bookkeeping they share (each resumes where it stopped)."""
