"""The bottom layer: errors, the config schema and loader, the data layout, atomic writes, hashing and the Spark session factory. Imports nothing of the project above it."""
