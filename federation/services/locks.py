"""Row locks on federations and nodes, taken in FOR NO KEY UPDATE mode.

A lock serialises changes to its row, yet leaves other transactions free
to insert rows that refer to it: audit entries, rounds, a round's
selection, updates. On PostgreSQL, the foreign key check of such an insert
takes a KEY SHARE lock on the row it refers to. FOR NO KEY UPDATE lets that
lock through, and FOR UPDATE, Django's default, blocks it.

With FOR UPDATE, an operator's node action and the opening of a round
deadlocked. The node action locked the node, then added an audit entry of
its federation. The opening locked the federation, then added the node to
the round's selection. Each waited for the other until PostgreSQL aborted
one.

Every other select_for_update() in the services passes no_key=True as well,
and `of=("self",)` when it joins a table whose rows it does not mean to lock.
The services lock rows to change columns that no foreign key refers to.
PostgreSQL still takes FOR UPDATE for an UPDATE of a column with a unique
index, such as a round's result_version. Every transaction that inserts
rows referring to a round first takes FOR SHARE on it, so such an insert
waits for that lock without forming a cycle.

Lock order: federation, then round, then reputations (in node order),
then nodes. An operator's node action locks only its node. Its audit
entry takes only KEY SHARE on the federation, so the action does not wait
for the federation lock of a round service. It waits only for rows that
an aggregation writes for the node (the node itself when it quarantines
it, and for a reinstate the reputation), and the aggregation commits
without waiting for the action. A round that opens or settles while
the action runs may therefore still select the node or aggregate its
update, as if the action had come just after it.

SQLite ignores these clauses: its transactions take the database's write
lock when they begin.
"""

from federation.models import Federation, Node


def lock_federation(federation_id: int) -> Federation:
    """Lock a federation's row for the rest of the transaction and return it, freshly read.

    Precondition: the caller is inside transaction.atomic().
    """
    return Federation.objects.select_for_update(no_key=True).get(id=federation_id)


def lock_node(node_id) -> Node:
    """Lock a node's row for the rest of the transaction and return it, freshly read, with its federation (not locked).

    Precondition: the caller is inside transaction.atomic().
    """
    return Node.objects.select_for_update(no_key=True, of=("self",)).select_related("federation").get(id=node_id)
