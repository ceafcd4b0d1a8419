"""Verification: commitments, signed receipts, tolerance audits, calibration, test cheats."""
