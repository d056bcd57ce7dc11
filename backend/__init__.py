"""The sample session-using application ("secure-api") from the deployment guide."""
