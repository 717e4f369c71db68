"""The suite's shared library: the file contract every stage follows (suite.contract, standard
library only), the synthetic corpus, the results table and figures, the demo and the bench, and
the Theorem 2 reproduction. Importing the package imports nothing else."""
