"""Imaging: conversion, preprocessing, segmentation, measurement, QC and the atlas.

Repeatable results: ANTs samples the registration metric at random and, with more than one
ITK thread, sums in an order that changes run to run; the same scan then gave different
volumes (and, before the skull-strip start, sometimes a failed registration). Unless the
environment says otherwise, ITK runs one thread per process and ANTs uses a fixed seed, set
here before any ANTs/ITK code is loaded, so that the same image always gives the same
numbers. Throughput comes from running jobs in parallel (``pipeline.workers``).
"""

import os

os.environ.setdefault("ANTS_RANDOM_SEED", "1")
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
