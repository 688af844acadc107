"""Protocol adapters (Burns ch. 5): each turns its wire format into ``InferenceRequest``
and a model server's reply back into its wire format."""
