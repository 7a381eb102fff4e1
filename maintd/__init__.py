"""maintd: uploads go live by themselves, in maintenance, atomically."""
