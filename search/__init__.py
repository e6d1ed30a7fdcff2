"""cnnsearch: hyperparameter search for CNN image classifiers."""

__version__ = "0.1.0"
