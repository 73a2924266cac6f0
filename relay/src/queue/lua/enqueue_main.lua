return enqueue()
