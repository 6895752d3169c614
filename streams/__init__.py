"""Transport: Kafka topics, Faust agents, Redis state. Agents stay thin; logic is in plain functions."""
