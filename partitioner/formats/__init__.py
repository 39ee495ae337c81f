"""The project's files: profiles, plans and traces, their units and the assumptions they carry."""
