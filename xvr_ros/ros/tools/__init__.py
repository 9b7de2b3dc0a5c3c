"""Tools around the nodes: bags, simulated sessions, replay with scoring, a pipeline client, shared reports."""
