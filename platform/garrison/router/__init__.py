"""The router: fair queueing across tenants and dispatch to model replicas."""
