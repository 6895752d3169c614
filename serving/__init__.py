"""HTTP (and Kafka request/response) scoring service fusing the three learners."""
