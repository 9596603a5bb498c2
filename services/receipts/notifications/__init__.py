"""Store notifications: the webhooks, the durable inbox, processing through the purchases core, reconciliation."""
