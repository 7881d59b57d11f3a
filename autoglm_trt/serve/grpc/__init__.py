"""KServe v2 gRPC API (inference.GRPCInferenceService): proto, generated code, servicer, server."""
