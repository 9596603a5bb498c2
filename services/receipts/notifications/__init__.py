"""Store notifications: the durable inbox, verification and processing."""
