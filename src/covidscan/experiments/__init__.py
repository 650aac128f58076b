"""The experiments wing: protocols that train and score many models (the paper's, leave-source-out).

* :mod:`~covidscan.experiments.paper`: the paper's models, protocols and reported accuracies;
* :mod:`~covidscan.experiments.reproduce`: ``covidscan reproduce``;
* :mod:`~covidscan.experiments.loso`: ``covidscan loso``, leave-source-out validation and its pooling;
* :mod:`~covidscan.experiments.ledger`: every leave-source-out variant measured, by name (``covidscan loso-report``).
"""
