"""The purchases core every path shares: verified purchase -> record -> credit -> outcome."""
