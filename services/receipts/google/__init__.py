"""The Google Play slice: the Android Publisher client, VerifyGooglePurchase and consume after credit."""
