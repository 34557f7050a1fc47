"""Prediction and learning: the ketamine-response classifier and everything around it.

One module per concept:

- ``classifier``: the scikit-learn Pipeline (TIV handling, scaling, linear SVC, calibration)
  and per-subject predictions with regional contributions;
- ``validation``: repeated stratified nested CV, bootstrap CIs, permutation test,
  leave-site-out, external validation metrics;
- ``cohort``: cohort CSV files and parallel, cached feature extraction;
- ``synthetic``: synthetic cohorts of phantoms with the study's direction planted (or null);
- ``files``: skops model files, metadata JSON, SHA-256, and the refusal rules;
- ``registry``: the model registry and prediction rows in the database;
- ``report``: the HTML report (ROC, confusion matrix, calibration, regional weights);
- ``training``: the train and evaluate workflows; ``demo_model``: the demonstration model.

Research use only.
"""
