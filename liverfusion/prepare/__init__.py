"""Export -> training-ready data set: ``python -m liverfusion.prepare`` (see docs/prepare.md).

Reads DICOM trees, NIfTI folders or the LLD-MMRI raw release; maps series to modalities by YAML rules; reorients,
resamples and optionally registers every modality of a case onto a reference grid; crops around lesions; writes
``subjects/<case>/<modality>.nii.gz`` + ``labels.csv`` + ``prepare_log.json`` + QA PNGs, with pseudonymous ids only.
"""

from liverfusion.prepare.app import PrepareResult, run_prepare

__all__ = ["PrepareResult", "run_prepare"]
