#!/usr/bin/env python3
"""Import circles between host/src's top-level modules.

An edge a -> b is a `crate::b` (or, in a top-level file, `super::b`) path in
module a's non-test code; a circle is a strongly connected component of
more than one module (Tarjan). Prints the count and each circle; `-v` also
prints the edges.

    python3 tests/support/import_circles.py [host/src] [-v]
"""
import os
import re
import sys
from collections import defaultdict

TEST_FILES = ('tests.rs', 'cluster_tests.rs', os.path.join('transport', 'router.rs'))


def sources(root):
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if name.endswith('.rs') and not rel.endswith(TEST_FILES):
                yield rel, open(path, encoding='utf-8').read()


def top(rel):
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith('.rs') else first


def graph(root):
    files = dict(sources(root))
    modules = {top(rel) for rel in files} - {'lib', 'main'}
    edges = defaultdict(set)
    for rel, text in files.items():
        a = top(rel)
        if a not in modules:
            continue
        text = text.split('#[cfg(test)]\nmod tests')[0]
        text = re.sub(r'//[^\n]*', '', text)
        text = re.sub(r'/\*.*?\*/', '', text, flags=re.S)
        for m in re.finditer(r'crate::(\{[^}]*\}|\w+)', text):
            group = m.group(1)
            names = re.findall(r'(?:^|[{,\s])(\w+)', group) if group.startswith('{') else [group]
            edges[a].update(b for b in names if b in modules and b != a)
        if os.sep not in rel:
            edges[a].update(b for b in re.findall(r'super::(\w+)', text) if b in modules and b != a)
    return modules, edges


def circles(modules, edges):
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(modules):
        if v not in index:
            visit(v)
    return found


def main():
    args = [a for a in sys.argv[1:] if a != '-v']
    root = args[0] if args else os.path.join(os.path.dirname(__file__), '..', '..', 'host', 'src')
    modules, edges = graph(root)
    found = circles(modules, edges)
    print(f'{len(modules)} top-level modules, {sum(map(len, edges.values()))} edges, {len(found)} circles')
    for component in found:
        print('circle:', ' '.join(component))
    if '-v' in sys.argv:
        for a in sorted(edges):
            print(a, '->', ' '.join(sorted(edges[a])))
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main())
