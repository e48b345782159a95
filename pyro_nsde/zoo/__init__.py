"""Ready-made parts: latent SDE models (:mod:`~pyro_nsde.zoo.models`), networks
(:mod:`~pyro_nsde.zoo.nn`), encoders, deep latent Gaussian models, data sets and irregular
series on a common grid."""
