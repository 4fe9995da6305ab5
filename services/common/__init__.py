"""What the lmx services share: settings, logging, errors, the server bootstrap."""
