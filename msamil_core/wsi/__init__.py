"""Whole-slide images: slide access, magnification geometry, thumbnails and meta.json, tissue
masks, mask files, patch coordinates, lesion annotations and QuPath GeoJSON."""
