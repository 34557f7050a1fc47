"""Prediction and learning: the ketamine-response classifier and everything around it.

One module per concept:

- ``classifier``: the scikit-learn Pipeline (TIV handling, scaling, linear SVC, calibration)
  and per-subject predictions with regional contributions;
- ``validation``: repeated stratified nested CV, bootstrap CIs, permutation test,
  leave-site-out, external validation metrics;
- ``cohort``: cohort CSV files and parallel, cached feature extraction;
- ``files``: skops model files, metadata JSON, SHA-256, the refusal rules, and where the
  shipped demonstration model is;
- ``registry``: the model registry and prediction rows in the database;
- ``html_report``: the HTML report (ROC, confusion matrix, calibration, regional weights);
- ``training``: the train and evaluate workflows.

Synthetic cohorts and the demonstration model's recipe are in :mod:`ketanode.synthetic`.

Research use only.
"""
