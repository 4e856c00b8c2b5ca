"""The pipeline: plain functions over the database. It imports models/ and config/, never
web/ or workers/; whatever it needs from those (an enqueue function, a gateway) is handed in."""
