/* list: an intrusive, doubly linked list of objects that embed a list_node.
 *
 * Owns: nothing; the objects live elsewhere. Locking: none inside; every
 * list has a lock of its owner's. Errors: none.
 */
#ifndef FLEECEFS_LIST_H
#define FLEECEFS_LIST_H

#include <stddef.h>

struct list_node {
	struct list_node *prev, *next;
};

struct list_head {
	struct list_node *first;
};

#define list_entry(node, type, member) ((type *)(void *)((char *)(node) - offsetof(type, member)))

static inline void list_push(struct list_head *head, struct list_node *node)
{
	node->prev = NULL;
	node->next = head->first;
	if (head->first)
		head->first->prev = node;
	head->first = node;
}

/* Removes node if it is in the list (a node never pushed is left alone). */
static inline void list_remove(struct list_head *head, struct list_node *node)
{
	if (node->prev)
		node->prev->next = node->next;
	else if (head->first == node)
		head->first = node->next;
	else
		return;
	if (node->next)
		node->next->prev = node->prev;
	node->prev = node->next = NULL;
}

#endif
