"""The worklist: scheduled exams created over REST (``/v1/worklists``), served to modalities
over Modality Worklist C-FIND, tracked by MPPS and linked to the images that arrive."""
