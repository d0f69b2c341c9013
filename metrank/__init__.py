"""metrank."""
