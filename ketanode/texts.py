"""The node's fixed wording: the research-use label and the demonstration-model label.

Every output that carries them (the SR, the report image, the dashboard, the CLI, the HTML
training report, a model file's metadata) imports them from here, so they read the same
everywhere. ``RESEARCH_USE_ONLY`` stays short: it heads DICOM Series Descriptions (LO, at
most 64 characters) such as ``DEMO RESEARCH USE ONLY ketanode ketamine response SR``.
"""

from __future__ import annotations

RESEARCH_USE_ONLY = "RESEARCH USE ONLY"
#: The label of a model trained on synthetic data (the packaged demonstration model); its
#: results always carry it.
DEMO_LABEL = "DEMONSTRATION MODEL trained on synthetic data - not a clinical prediction"
#: What marks a result of a synthetic (demonstration) model in series descriptions and text.
DEMO = "DEMO"
