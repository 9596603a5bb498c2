"""The Google Play path of the receipts service: the Android Publisher client,
VerifyGooglePurchase and the consumption queue."""
