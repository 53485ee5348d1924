"""Domain objects of the workstation API (workstation-api.md, "Python API"): images and
segmentations as volumes with geometry, and the measurements made on them."""
