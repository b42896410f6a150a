"""smtpd."""
