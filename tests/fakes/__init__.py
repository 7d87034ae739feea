"""Fakes for the services that cannot run here, speaking their real wire formats."""
