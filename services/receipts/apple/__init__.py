"""The App Store slice: verify a JWS, a transaction id or an app receipt, down to the purchases core."""
