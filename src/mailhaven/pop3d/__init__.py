"""pop3d."""
