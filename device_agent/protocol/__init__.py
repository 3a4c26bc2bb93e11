"""What crosses MQTT: topic names (``topics``) and message schemas (``messages``)."""
