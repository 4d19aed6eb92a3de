"""The gateway: the gRPC services (Inference, Admin, health, reflection) a client talks to."""
