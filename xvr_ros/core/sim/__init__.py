"""The X-ray simulator: single degraded X-rays and fluoroscopy sessions."""
