/* gate: see include/fleecefs/gate.h */
#include "config.h"

#include "fleecefs/gate.h"

void gate_init(struct gate *g)
{
	atomic_init(&g->inside, 0);
	atomic_init(&g->closed, false);
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->changed, NULL);
	pthread_mutex_init(&g->close_mutex, NULL);
}

void gate_destroy(struct gate *g)
{
	pthread_mutex_destroy(&g->close_mutex);
	pthread_cond_destroy(&g->changed);
	pthread_mutex_destroy(&g->lock);
}

void gate_enter_slow(struct gate *g)
{
	for (;;) {
		/* Back out so the closer can finish, then wait for the reopening. */
		gate_exit(g);
		pthread_mutex_lock(&g->lock);
		while (atomic_load(&g->closed))
			pthread_cond_wait(&g->changed, &g->lock);
		pthread_mutex_unlock(&g->lock);
		atomic_fetch_add(&g->inside, 1);
		if (!atomic_load(&g->closed))
			return;
	}
}

void gate_close(struct gate *g)
{
	pthread_mutex_lock(&g->close_mutex);
	pthread_mutex_lock(&g->lock);
	atomic_store(&g->closed, true);
	while (atomic_load(&g->inside) != 0)
		pthread_cond_wait(&g->changed, &g->lock);
	pthread_mutex_unlock(&g->lock);
}

void gate_open(struct gate *g)
{
	pthread_mutex_lock(&g->lock);
	atomic_store(&g->closed, false);
	pthread_cond_broadcast(&g->changed);
	pthread_mutex_unlock(&g->lock);
	pthread_mutex_unlock(&g->close_mutex);
}
