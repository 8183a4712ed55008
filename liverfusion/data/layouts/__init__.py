"""Data set layouts behind one interface: each scans a folder into :class:`~liverfusion.data.case.Case` objects.

- :class:`LLDMMRILayout`: the LLD-MMRI crop release (``images/<case>/<Phase>.nii.gz`` + ``labels.txt``), also used by
  the embedded phantom;
- :class:`GenericLayout`: ``subjects/<case>/<modality>.nii.gz`` + a labels CSV (e.g. the LGG set, ``prepare`` output);
- :class:`FolderLayout`: unlabelled files matched by a pattern (e.g. CHAOS), for pre-training;
- :class:`UnionLayout`: several of the above as one pool.
"""

from liverfusion.data.layouts.base import LabelSpec, Layout, match_file, name_key, patient_from_case
from liverfusion.data.layouts.folder import FolderLayout
from liverfusion.data.layouts.generic import GenericLayout
from liverfusion.data.layouts.lldmmri import LLDMMRILayout
from liverfusion.data.layouts.phantom import PhantomLayout
from liverfusion.data.layouts.union import UnionLayout

__all__ = [
    "FolderLayout",
    "GenericLayout",
    "LLDMMRILayout",
    "LabelSpec",
    "Layout",
    "PhantomLayout",
    "UnionLayout",
    "match_file",
    "name_key",
    "patient_from_case",
]
