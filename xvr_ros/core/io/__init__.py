"""What comes in from disk: volumes, X-ray images (DICOM and plain), atomic writes."""
