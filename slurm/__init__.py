"""Submitit launchers for every stage of the suite (pretrain, transfer over seeds, the pipeline).
`slurm.pipeline` holds the stage list and imports nothing beyond the standard library and
suite.contract."""
