"""The App Store path of the receipts service."""
