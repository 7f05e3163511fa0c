//! Wildcard matching for env-var patterns and sandbox path globs.

/// Match `name` against `pattern`, where `star` matches any run of items
/// and `one` any single item. Iterative, with one backtrack point for the
/// last star. Env-var patterns match lower-cased chars; sandbox globs match
/// the bytes of one path component.
pub fn wildcard<T: Copy + PartialEq>(pattern: &[T], name: &[T], star: T, one: T) -> bool {
    let (mut pi, mut ni) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < name.len() {
        if pi < pattern.len() && (pattern[pi] == one || pattern[pi] == name[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < pattern.len() && pattern[pi] == star {
            backtrack = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = backtrack {
            pi = sp + 1;
            ni = sn + 1;
            backtrack = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[pi..].iter().all(|&c| c == star)
}
