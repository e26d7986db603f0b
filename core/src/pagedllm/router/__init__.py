"""Replicas behind one endpoint: KV-event cache views, the routing policy and the standalone router."""
