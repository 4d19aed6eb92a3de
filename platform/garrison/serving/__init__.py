"""`garrison serve`: configuration, cluster bring-up and the server's lifecycle."""
