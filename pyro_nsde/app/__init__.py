"""The application: the command line (``pyro-nsde``), the training loop :func:`fit_svi`,
checkpoints, data-parallel training and checked SVI steps."""
