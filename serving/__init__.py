"""The Ray Serve application: gateway, protocol adapters, model servers, metrics."""
